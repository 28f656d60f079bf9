"""`xdistill bench`: a 3-step run at a tiny size (table + JSON), helpers, and the import contract
(the train step and the benchmark import on an accelerator image without TFDS or grain)."""

import json
import os
import pathlib
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from xdistill_jax import benchmark, cli, compilation_cache

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def bench_run(tmp_path_factory):
    """One CLI run: fp32 X-Distill step (translator + teacher), 32x64, batch 2, 3 timed steps,
    then 5 profiled ones."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        status = cli.main([
            "bench", "--config", str(ROOT / "configs" / "synthetic_demo.py") + ":smoke",
            "--steps", "3", "--warmup", "0", "--dtypes", "float32", "--distill", "on",
            "--json", str(out), "--profile-dir", str(out.parent / "profile"), "--config.mesh.num_devices=1", "--config.data.height=32",
            "--config.data.width=64", "--config.optim.batch_size=2",
        ])
    return status, buf.getvalue(), out


def test_bench_prints_table_and_writes_json(bench_run):
    status, stdout, path = bench_run
    assert status == 0, stdout
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("| variant"))
    assert "Train step benchmark on 1 x cpu (cpu)" in lines[header - 2]
    assert [c.strip() for c in lines[header].strip("|").split("|")] == list(benchmark.COLUMNS)
    row = [c.strip() for c in lines[header + 2].strip("|").split("|")]
    assert row[:3] == ["fp32 distill=on", "2", "32x64"]
    assert row[10] == "n/a" and row[11] == "n/a"  # no peak FLOP/s or memory_stats on CPU

    doc = json.loads(path.read_text())
    assert doc["platform"] == "cpu" and doc["kind"] == "train_step"
    # the flags the run was compiled under (gpu.sh's run without autotuning sets some)
    assert doc["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    assert ("(XLA_FLAGS=" in lines[header - 2]) == bool(doc["xla_flags"].strip())
    # what was measured: the code (this checkout's commit), the host CPU, the compilation cache
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert doc["code_version"].split("+")[0] == head.stdout.strip()
    assert doc["host_cpu"]["cores_usable"] >= 1 and doc["compilation_cache_dir"]
    (r,) = doc["results"]
    assert r["teacher_stride"] == 4 and r["peak_memory_scope"] == "process"
    assert (r["dtype"], r["distill"], r["batch"], r["height"], r["width"]) == ("float32", True, 2, 32, 64)
    assert r["steps"] == 3 and r["devices"] == 1
    # the table shows the JSON's figures
    assert row[3] == f"{r['images_per_s_median']:.1f}"
    assert row[4] == f"{r['images_per_s_pipelined']:.1f}" and r["images_per_s_pipelined"] > 0
    assert row[9] == f"{r['flops_per_step'] * 1e-9:.1f}"
    assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
    assert len(r["step_ms_all"]) == r["steps"]
    assert max(r["step_ms_all"]) == pytest.approx(r["step_ms_max"], abs=1e-3)
    assert sorted(r["step_ms_all"])[r["steps"] // 2] == pytest.approx(r["step_ms_median"], abs=1e-3)
    assert r["images_per_s_median"] == pytest.approx(2 / (r["step_ms_median"] / 1e3))
    # the garbage collector during the steps: the heap left by tracing and compiling was frozen
    # (thousands of objects), each timed step's collection time is recorded, and the totals cover
    # those steps (and the back-to-back ones)
    assert r["gc_frozen_objects"] > 10_000
    assert len(r["gc_ms_all"]) == r["steps"] and min(r["gc_ms_all"]) >= 0
    assert set(r["gc_collections"]) == {"0", "1", "2"}
    assert r["gc_ms_total"] >= sum(r["gc_ms_all"]) - 1e-2
    # the start as in training: the step compiled on a thread while the init compiled and ran,
    # so it took at least as long as each and less than the two one after the other
    assert r["start"] == "overlapped" and r["init_s"] > 0 and r["compile_s"] > 0
    assert max(r["init_s"], r["compile_s"]) <= r["cold_start_s"] < r["init_s"] + r["compile_s"]
    assert row[8] == f"{r['cold_start_s']:.2f}"
    # Two ResNet-18s forward+backward at 32x64 x2 images: far more than 1e8, far less than 1e11 FLOPs.
    assert 1e8 < r["flops_per_step"] < 1e11
    assert r["fraction_of_peak"] is None and r["peak_memory_bytes"] is None
    assert r["xla_memory_bytes"] > 4 * 4 * 20e6  # params + grads + 2 Adam moments of ~27M fp32
    assert np.isfinite(r["final_loss"])


def test_bench_profile_attributes_the_step_to_its_parts(bench_run):
    """--profile-dir: the traced steps' op time is split over the step's named scopes; every
    part of the X-Distill step shows up, forward and backward where it has a gradient."""
    status, stdout, path = bench_run
    assert status == 0, stdout
    assert "Where the time of fp32 distill=on goes" in stdout
    (r,) = json.loads(path.read_text())["results"]
    prof = r["profile"]
    scopes = {s["scope"]: s for s in prof["scopes"]}
    for part in ("depth_net", "pose_net", "upsample", "warp", "reprojection", "select", "translator",
                 "distill", "optimizer"):
        assert scopes[part]["ms"] > 0, (part, prof["scopes"])
    for part in ("depth_net", "pose_net", "warp", "translator"):
        assert scopes[part]["fwd_ms"] > 0 and scopes[part]["bwd_ms"] > 0, (part, scopes[part])
    assert scopes["optimizer"]["bwd_ms"] == 0  # the update is not differentiated
    assert prof["busy_ms_per_step"] == pytest.approx(sum(s["ms"] for s in prof["scopes"]))
    assert prof["busy_ms_per_step"] == pytest.approx(sum(k["ms"] for k in prof["kinds"]))
    assert prof["source"]["module_matched"] and prof["unattributed_ops"] == 0
    # networks dominate at this size on CPU: most op time is in scopes, not "other"
    assert scopes.get("other", {"ms": 0})["ms"] < 0.5 * prof["busy_ms_per_step"]
    kinds = {k["kind"] for k in prof["kinds"]}
    assert "convolution/matmul" in kinds and "gather/scatter" in kinds
    out = path.parent / "profile" / "float32_distill_1"
    assert (out / "summary.md").read_text().startswith("XLA op time per step")
    import gzip

    with gzip.open(out / "optimized_hlo.txt.gz", "rt") as f:
        hlo = f.read()
    assert hlo.startswith("HloModule jit_train_step")
    top = prof["top_ops"][0]["op"]
    assert f"%{top} = " in hlo or f" {top} = " in hlo


def test_a_failed_profile_summary_keeps_the_timings(monkeypatch, tmp_path):
    """A GPU image without CUPTI traces no device ops: the summary fails, the figures stand."""
    from xdistill_jax import config_utils, profile_summary

    def no_events(*args, **kwargs):
        raise ValueError("trace.xplane.pb: no events with an hlo_op stat (no XLA ops were traced)")

    monkeypatch.setattr(profile_summary, "summarize_trace", no_events)
    config = config_utils.apply_overrides(
        config_utils.load_config_file(str(ROOT / "configs" / "synthetic_demo.py") + ":smoke"),
        ["--config.mesh.num_devices=1", "--config.data.height=32", "--config.data.width=64",
         "--config.optim.batch_size=2"])
    r = benchmark.benchmark_step(config, steps=1, warmup=0, profile_dir=str(tmp_path / "prof"))
    assert r["profile"] == {"error": "ValueError: trace.xplane.pb: no events with an hlo_op stat "
                                     "(no XLA ops were traced)"}
    assert r["images_per_s_median"] > 0 and np.isfinite(r["final_loss"])
    assert (tmp_path / "prof" / "summary.md").read_text().startswith("no profile summary: ValueError")


def test_bench_rejects_bad_lists(capsys, tmp_path):
    # --json / --profile-dir that cannot be written: named before anything is measured (--json
    # was written after the whole benchmark, an IsADirectoryError traceback, a .tmp left behind)
    (tmp_path / "afile").write_text("x")
    for args, message in ((["--json", str(tmp_path)], f"--json {tmp_path} is a folder; give a file name"),
                          (["--loader", "--json", str(tmp_path / "afile" / "r.json")],
                           f"--json {tmp_path / 'afile' / 'r.json'}: its folder {tmp_path / 'afile'} exists and "
                           "is not a folder"),
                          (["--profile-dir", str(tmp_path / "afile")], "--profile-dir")):
        assert cli.main(["bench", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert cli.main(["bench", "--dtypes", "float16"]) == 2
    assert "--dtypes" in capsys.readouterr().err
    assert cli.main(["bench", "--config.optim.nope=1"]) == 2
    assert "optim.nope" in capsys.readouterr().err
    # were tracebacks (a ZeroDivisionError; the mesh's ConfigError raised outside the checks; the
    # loader's UnboundLocalError when no batch was left to time)
    for args, message in ((["--teacher-stride", "0"], "--teacher-stride must be >= 1, got 0"),
                          (["--config.mesh.num_devices=8"], "config.mesh.num_devices=8 but only 4 devices exist"),
                          (["--config.mesh.num_devices=2", "--config.optim.batch_size=3"], "batch_size"),
                          (["--loader", "--loader-epochs", "0"], "epochs must be an integer >= 1, got 0"),
                          (["--loader", "--loader-examples", "12", "--loader-epochs", "1"],
                           "12 examples x 1 epochs at batch 12 give 1 batch(es): the first warms up, none would be timed")):
        assert cli.main(["bench", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_fraction_of_peak_is_against_the_meshs_peak(monkeypatch):
    """The FLOPs are the whole mesh's: on 2 devices the fraction is against 2 devices' peak (it
    was against one's, reading twice the fraction)."""
    from xdistill_jax import config_utils

    monkeypatch.setattr(benchmark, "peak_flops", lambda device: 1e12)
    config = config_utils.config_from_args(str(ROOT / "configs" / "synthetic_demo.py") + ":smoke", [
        "--config.mesh.num_devices=2", "--config.data.height=32", "--config.data.width=64",
        "--config.optim.batch_size=2", "--config.distill.weight=0"])
    r = benchmark.benchmark_step(config, steps=1, warmup=0)
    assert r["devices"] == 2 and r["peak_flops_per_s"] == 2e12 and r["peak_flops_dtype"] == "bfloat16"
    assert r["fraction_of_peak"] == pytest.approx(r["flops_per_step"] / (r["step_ms_median"] / 1e3) / 2e12)


def test_later_variants_peak_memory_is_marked_the_processs():
    """Several variants in one process: the device's peak counter is never reset, so the rows after
    the first show the process's peak so far, marked "<=" (they read as each variant's own)."""
    base = {"batch": 12, "height": 192, "width": 640, "images_per_s_median": 600.0, "images_per_s_pipelined": 700.0,
            "step_ms_median": 20.0, "init_s": 5.0, "compile_s": 9.0, "cold_start_s": 9.5, "flops_per_step": 1.2e12,
            "fraction_of_peak": 0.06, "xla_memory_bytes": 2e9, "devices": 1}
    results = benchmark.mark_process_peaks([{**base, "variant": "fp32 distill=on", "peak_memory_bytes": 5.77e9,
                                             "peak_memory_scope": "process"},
                                            {**base, "variant": "fp32 distill=off", "peak_memory_bytes": 5.77e9,
                                             "peak_memory_scope": "process"}])
    assert results[0]["peak_memory_scope"] == "process" and "upper bound" in results[1]["peak_memory_scope"]
    table = benchmark.markdown_table(results, device="1 x NVIDIA H100 80GB HBM3 (gpu)")
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| fp32")]
    assert rows[0][11] == "5.77" and rows[1][11] == "<= 5.77"
    assert "| % of bf16 peak |" in table


def test_state_layout_auto_runs_the_same_step():
    """--state-layout auto (XLA picks the state's device layouts; the state is put into the
    compiled step's input formats): the same training trajectory as the default layouts. On
    this CPU XLA keeps row-major layouts, so the losses are bitwise equal; a GPU stores
    convolution kernels in another order (benchmarks/RESULTS.md) with the same values."""
    from xdistill_jax import config_utils, train

    config = config_utils.config_from_args(str(ROOT / "configs" / "synthetic_demo.py") + ":smoke", [
        "--config.mesh.num_devices=1", "--config.data.height=32", "--config.data.width=64",
        "--config.optim.batch_size=2", "--config.distill.weight=0"])
    runs = {layout: benchmark.benchmark_step(config, steps=1, warmup=0, state_layout=layout, start=start)
            for layout, start in (("default", "overlapped"), ("auto", "sequential"))}
    # one after the other: the start is the init, then the compile
    assert runs["auto"]["start"] == "sequential"
    assert runs["auto"]["cold_start_s"] == pytest.approx(runs["auto"]["init_s"] + runs["auto"]["compile_s"], abs=0.25)
    assert runs["default"]["variant"] == "fp32 distill=off" and runs["default"]["state_layout"] == "default"
    assert runs["auto"]["variant"] == "fp32 distill=off state=auto" and runs["auto"]["state_layout"] == "auto"
    assert np.isfinite(runs["auto"]["final_loss"])
    assert runs["auto"]["final_loss"] == runs["default"]["final_loss"]  # after 3 steps each
    with pytest.raises(ValueError, match="state_layout"):
        train.make_train_step(config, None, None, None, state_layout="row_major")
    with pytest.raises(ValueError, match="start must be one of"):
        benchmark.benchmark_step(config, steps=1, start="parallel")


def test_bench_rejects_an_unknown_state_layout(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--state-layout", "tiled"])
    assert e.value.code == 2 and "--state-layout" in capsys.readouterr().err


def test_synthetic_batch_follows_the_loader_contract():
    b = benchmark.synthetic_batch(2, 64, 96, num_groups=7, teacher_stride=2)
    assert b["color"].shape == b["color_aug"].shape == (2, 3, 64, 96, 3) and b["color"].dtype == np.uint8
    for s in (1, 2, 3):
        assert b[f"color_s{s}"].shape == (2, 3, 64 >> s, 96 >> s, 3)
    assert b["K"].shape == b["inv_K"].shape == (2, 4, 4, 4) and b["K"].dtype == np.float32
    # K at scale 1: fx = 0.58 * 48, cy = 0.5 * 32; inv_K its inverse
    assert b["K"][0, 1, 0, 0] == pytest.approx(0.58 * 48) and b["K"][0, 1, 1, 2] == pytest.approx(16.0)
    np.testing.assert_allclose(b["K"][1, 2] @ b["inv_K"][1, 2], np.eye(4), atol=1e-5)
    assert b["teacher"].shape == (2, 32, 48, 7) and b["teacher"].dtype == np.float16
    assert "teacher" not in benchmark.synthetic_batch(2, 64, 96)


def test_peak_flops_table():
    dev = lambda kind, platform="gpu": types.SimpleNamespace(device_kind=kind, platform=platform)  # noqa: E731
    assert benchmark.peak_flops(dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert benchmark.peak_flops(dev("NVIDIA H100 PCIe")) == 756e12
    assert benchmark.peak_flops(dev("NVIDIA H200")) == 989e12
    assert benchmark.peak_flops(dev("NVIDIA H100 NVL")) == benchmark.peak_flops(dev("NVIDIA H200 NVL")) == 835e12
    assert benchmark.peak_flops(dev("cpu", "cpu")) is None
    assert benchmark.peak_flops(dev("Some Future Chip")) is None


def test_flops_are_counted_on_the_traced_program():
    """The bench's FLOPs come from the lowered program: a convolution's 2*N*Ho*Wo*kh*kw*Cin*Cout
    (worked out by hand), which the compiled program drops where the conv is a library call (cuDNN
    on a GPU); on the CPU both count it the same."""
    import jax
    import jax.numpy as jnp

    conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "OHWI", "NHWC")))
    x, k = jnp.ones((2, 12, 20, 8)), jnp.ones((16, 3, 3, 8))
    lowered = conv.lower(x, k)
    flops, _ = benchmark._cost(lowered)
    assert flops == 2 * 2 * 10 * 18 * 3 * 3 * 8 * 16  # (XLA leaves out taps on SAME's padding)
    assert benchmark._cost(lowered.compile())[0] == flops


def test_variant_config():
    from xdistill_jax.config_defaults import base_config

    c = base_config()
    off = benchmark.variant_config(c, benchmark.Variant("bfloat16", False))
    assert off.model.dtype == "bfloat16" and off.distill.weight == 0.0 and c.distill.weight == 0.1
    c.distill.weight = 0.0
    assert benchmark.variant_config(c, benchmark.Variant("float32", True)).distill.weight == 0.1
    assert [v.name for v in benchmark.variants()] == [
        "bf16 distill=on", "bf16 distill=off", "fp32 distill=on", "fp32 distill=off"]


def test_compilation_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV_VAR, raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert compilation_cache.cache_dir() == compilation_cache.DEFAULT_DIR
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compilation_cache.cache_dir() == tmp_path / "jax"
    monkeypatch.setenv(compilation_cache.ENV_VAR, "off")
    assert compilation_cache.cache_dir() is None
    assert compilation_cache.cache_dir(tmp_path / "flag") == tmp_path / "flag"


_BLOCKER = """
import importlib.abc, sys
BLOCKED = {"tensorflow_datasets", "grain", "array_record", "tensorflow", "PIL", "scipy", "torch"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
import xdistill_jax.train, xdistill_jax.objective, xdistill_jax.benchmark, xdistill_jax.commands.bench
import xdistill_jax.training_loop
b = xdistill_jax.benchmark.synthetic_batch(1, 32, 32, num_groups=7)
try:
    import grain
except ImportError:
    print("core imports without TFDS and grain")
"""


def test_core_imports_without_tfds_and_grain():
    proc = subprocess.run([sys.executable, "-c", _BLOCKER], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "core imports without TFDS and grain" in proc.stdout


@pytest.mark.parametrize("script", ["gpu_aot.py", "tpu_aot.py"])
@pytest.mark.parametrize("flag, value", [("--dtypes", "bf16"), ("--distill", "yes"), ("--dtypes", "")])
def test_aot_scripts_name_a_bad_variant_flag(script, flag, value):
    """benchmarks/gpu_aot.py and tpu_aot.py reject an unknown dtype or distill value before
    importing jax, naming the flag and what it accepts (gpu_aot used to fail deep in the config
    with a KeyError)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), f"{flag}={value}"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert f"argument {flag}: expected a comma list of" in proc.stderr, proc.stderr


def test_tpu_aot_without_libtpu_says_what_to_install():
    """Without libtpu (the test environment has none) tpu_aot stops at the topology, naming it
    and the package, before compiling anything."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed here")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tpu_aot.py"), "--topology", "v5e:2x2"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert "tpu_aot: no TPU topology 'v5e:2x2'" in proc.stderr and "libtpu" in proc.stderr, proc.stderr


def test_aot_tables_say_per_device_figures():
    """The deviceless tables of a multi-device target say that their figures are one device's
    and list the collectives (what benchmarks/RESULTS.md quotes)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_aot
        import tpu_aot
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    row = {"variant": "bf16 distill=on", "batch": 12, "hw": "192x640", "compile_s": 185.8,
           "memory_bytes": 2.67e9, "flops": 3.46e11, "bytes_accessed": 1.62e12,
           "collectives": {"all-reduce": {"count": 35, "elements": {"f32": 26_980_000, "bf16": 12_000}}}}
    text = tpu_aot.table([row], "TPU v5 lite", 4)
    assert "4 x TPU v5 lite" in text and "figures per chip, batch global" in text
    assert ("| bf16 distill=on | 12 | 192x640 | 185.8 | 2.67 | 346 | 1620 | "
            "35 all-reduce (26.98 M f32, 0.01 M bf16) |") in text
    assert "| none |" in tpu_aot.table([{**row, "collectives": {}}], "TPU v5 lite", 4)
    gpu_row = {"variant": "bf16 distill=on", "batch": 48, "hw": "192x640", "compile_s": 22.2, "init_compile_s": 4.0,
               "memory_bytes": 2.71e9, "kernels": 1803, "fusions": 1439, "library_calls": 190, "copies": 20,
               "bytes": 19.4e9, "roofline_ms": 4.04, "roofline_images_per_s": 11881, "devices": 4}
    assert "NVIDIA H200, 4 of them, figures per GPU, batch global" in gpu_aot.table([gpu_row], {"device": "NVIDIA H200"})
    assert "4 of them" not in gpu_aot.table([{**gpu_row, "devices": 1}], {"device": "NVIDIA H200"})


def _gpu_run_json(path, device="NVIDIA H100 80GB HBM3", **result):
    base = {"height": 192, "width": 640, "batch": 12, "num_layers": 18, "images_per_s_median": None,
            "step_ms_median": None, "cold_start_s": None, "peak_memory_bytes": None}
    path.write_text(json.dumps({"kind": "train_step", "device": f"1 x {device} (gpu)", "device_kind": device,
                                "results": [{**base, **result}]}))


def _gpu_targets_rows(outdir):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_targets.py"), str(outdir)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| figure")}
    return proc.stdout, rows


def test_gpu_targets_reads_each_figure_against_its_target(tmp_path):
    """benchmarks/gpu_targets.py (the end of gpu.sh's summary.md) on hand-made run JSONs:
    overheads are step-time ratios of the named runs, verdicts compare with the issue's targets,
    absent runs or quantities say "not measured", another shape gives no verdicts."""
    _gpu_run_json(tmp_path / "bf16_distill_cold.json", images_per_s_median=900.0, step_ms_median=11.0,
                  cold_start_s=28.0, peak_memory_bytes=3.1e9)
    _gpu_run_json(tmp_path / "bf16_distill_warm.json", images_per_s_median=1090.0, step_ms_median=11.0,
                  cold_start_s=12.5, peak_memory_bytes=3.0e9, images_per_s_pipelined=1234.5)
    _gpu_run_json(tmp_path / "bf16_distill_warm_sequential.json", cold_start_s=14.3)
    _gpu_run_json(tmp_path / "bf16_distill_nocmdbuf.json", step_ms_median=11.55, step_ms_all=[11.5, 11.6])
    _gpu_run_json(tmp_path / "bf16_nodistill_cold.json", step_ms_median=10.0, peak_memory_bytes=7.0e9)
    _gpu_run_json(tmp_path / "bf16_distill_stride1_cold.json", step_ms_median=12.5, peak_memory_bytes=9.0e9)
    _gpu_run_json(tmp_path / "bf16_distill_nopad_cold.json", step_ms_median=13.2)
    _gpu_run_json(tmp_path / "bf16_distill_noautotune_cold.json", images_per_s_median=950.0, cold_start_s=21.0,
                  compile_s=18.2)
    _gpu_run_json(tmp_path / "bf16_distill_noautotune_parallel_cold.json", compile_s=9.4)
    _gpu_run_json(tmp_path / "bf16_distill_autotune1_cold.json", images_per_s_median=1010.0, cold_start_s=44.5)
    _gpu_run_json(tmp_path / "bf16_distill_hwio_cold.json", step_ms_median=12.1,
                  step_ms_all=[12.0, 250.4, 12.1], gc_ms_all=[0.0, 231.25, 0.5],
                  gc_collections={"0": 7, "1": 1, "2": 1}, gc_ms_total=232.0)
    (tmp_path / "notes.json").write_text(json.dumps({"kind": "loader", "results": [{}]}))  # not a step run
    out, rows = _gpu_targets_rows(tmp_path)
    assert rows["images/s, bf16, distillation on (bf16_distill_warm)"] == ["1,090.0", ">= 1,000", "met |"]
    assert rows["images/s, bf16, distillation on, steps back to back (bf16_distill_warm)"] == \
        ["1,234.5", "(reported)", "- |"]
    assert rows["images/s, fp32, distillation on"][0] == "not measured"
    assert rows["step time without command buffers (bf16_distill_nocmdbuf) vs run 1"] == \
        ["+5.0 %", "(reported)", "- |"]
    # 11 / 10 ms: +10.0 % meets "<= +10 %"; the full-resolution translator 12.5 / 10: +25.0 %
    assert rows["distillation's step time, bf16 (median step, on vs off)"] == ["+10.0 %", "<= +10 %", "met |"]
    assert rows["distillation's step time, bf16, full-resolution translator"][0] == "+25.0 %"
    assert rows["distillation's step time, fp32"][0] == "not measured"
    # over the targets' own runs: the full-resolution translator's 9 GB is an experiment's
    assert rows["peak device memory, largest of the target runs (bf16/fp32, distillation on/off)"] == \
        ["7.00 GB", "<= 6.6 GB", "MISSED |"]
    assert rows["cold start (init + compile), empty cache"] == ["28.0 s", "<= 30 s", "met |"]
    assert rows["start (init + compile), warm cache"] == ["12.5 s", "<= 10 s", "MISSED |"]
    assert rows["start, warm cache, init then compile (bf16_distill_warm_sequential)"] == \
        ["14.3 s", "(reported)", "- |"]
    assert rows["cold start, no autotuning (bf16_distill_noautotune_cold)"] == ["21.0 s", "(reported)", "- |"]
    assert rows["images/s, bf16, distillation on, no autotuning"] == ["950.0", "(reported)", "- |"]
    assert rows["compile, no autotuning (bf16_distill_noautotune_cold)"] == ["18.2 s", "(reported)", "- |"]
    assert rows["compile, no autotuning, parallel LLVM modules (bf16_distill_noautotune_parallel_cold)"] == \
        ["9.4 s", "(reported)", "- |"]
    assert rows["cold start, autotuning level 1 (bf16_distill_autotune1_cold)"] == ["44.5 s", "(reported)", "- |"]
    assert rows["images/s, bf16, distillation on, autotuning level 1"] == ["1,010.0", "(reported)", "- |"]
    assert rows["step time with HWIO kernels (bf16_distill_hwio_cold) vs run 1"] == ["+10.0 %", "(reported)", "- |"]
    assert rows["step time without channel padding (bf16_distill_nopad_cold) vs run 1"] == \
        ["+20.0 %", "(reported)", "- |"]
    assert "Device: 1 x NVIDIA H100 80GB HBM3 (gpu)." in out and "no verdicts" not in out
    # the slowest timed step of each run that lists its steps, and the garbage collector in it
    assert rows["bf16_distill_hwio_cold"] == ["12.1", "250.4 (step 2 of 3)", "231.2", "7 / 1 / 1, 232.0 ms |"]
    assert "bf16_distill_cold" not in rows  # no step list: not in that table
    assert rows["bf16_distill_nocmdbuf"] == ["11.6", "11.6 (step 2 of 2)", "not recorded", "not recorded |"]

    _gpu_run_json(tmp_path / "bf16_nodistill_cold.json", step_ms_median=10.0, batch=2)
    out, _ = _gpu_targets_rows(tmp_path)
    assert "192x640 batch 2 ResNet-18 on 1 device(s); no verdicts" in out
    assert " met |" not in out and "MISSED" not in out
    # 4 GPUs: another setting too (their images/s are not one H100's)
    _gpu_run_json(tmp_path / "bf16_nodistill_cold.json", step_ms_median=10.0, devices=4)
    out, _ = _gpu_targets_rows(tmp_path)
    assert "192x640 batch 12 ResNet-18 on 4 device(s); no verdicts" in out and " met |" not in out
    _gpu_run_json(tmp_path / "bf16_nodistill_cold.json", step_ms_median=10.0)

    (tmp_path / "broken.json").write_text("{")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_targets.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "broken.json: not JSON" in proc.stderr


@pytest.mark.parametrize("ips, verdict", [(999.0, "MISSED (an H100 is not faster)"),
                                          (1200.0, "undecided (an H100 may be up to 1.43x slower)"),
                                          (1440.0, "met (an H100 is at most 1.43x slower)")])
def test_gpu_targets_on_an_h200_bound_the_h100_verdict(tmp_path, ips, verdict):
    """An H200 run (the H100's chip, 4.8 / 3.35 TB/s memory): its images/s decide the H100's target
    only outside [1,000, 1,433); the other verdicts are marked as the H200's own."""
    for name in ("bf16_distill_cold", "bf16_distill_warm"):
        _gpu_run_json(tmp_path / f"{name}.json", "NVIDIA H200", images_per_s_median=ips, step_ms_median=10.5,
                      cold_start_s=40.0, peak_memory_bytes=3.0e9)
    _gpu_run_json(tmp_path / "bf16_nodistill_cold.json", "NVIDIA H200", step_ms_median=10.0)
    out, rows = _gpu_targets_rows(tmp_path)
    assert rows["images/s, bf16, distillation on (bf16_distill_warm)"][2] == verdict + " |"
    assert rows["distillation's step time, bf16 (median step, on vs off)"] == ["+5.0 %", "<= +10 %", "met on the H200 |"]
    assert rows["peak device memory, largest of the target runs (bf16/fp32, distillation on/off)"][2] == \
        "met on the H200 |"
    assert rows["cold start (init + compile), empty cache"][2] == "MISSED on the H200 |"
    assert "this NVIDIA H200 is its chip with 1.43x its memory bandwidth" in out


def test_gpu_targets_give_no_verdict_for_another_device(tmp_path):
    _gpu_run_json(tmp_path / "bf16_distill_warm.json", "NVIDIA A100-SXM4-80GB", images_per_s_median=1500.0,
                  peak_memory_bytes=3.0e9)
    out, rows = _gpu_targets_rows(tmp_path)
    assert "not a NVIDIA A100-SXM4-80GB's: no verdicts" in out
    assert rows["images/s, bf16, distillation on (bf16_distill_warm)"] == ["1,500.0", ">= 1,000", "does not apply (device) |"]
    assert rows["peak device memory, largest of the target runs (bf16/fp32, distillation on/off)"][2] == \
        "does not apply (device) |"
    assert " met" not in out and "MISSED" not in out

    _gpu_run_json(tmp_path / "bf16_distill_cold.json", "NVIDIA H100 80GB HBM3", images_per_s_median=1500.0)
    out, _ = _gpu_targets_rows(tmp_path)
    assert "Runs from several devices (NVIDIA A100-SXM4-80GB, NVIDIA H100 80GB HBM3): no verdicts." in out
    assert " met" not in out and "MISSED" not in out


def test_gpu_sh_names_a_failed_run_drops_its_old_json_and_exits_1(tmp_path):
    """A failed run was said on stdout only: summary.md left it out, the script exited 0, and an
    earlier call's JSON of that run (the output folder reused) was read as this call's figures."""
    stale = {"kind": "train_step", "device": "1 x NVIDIA H100 80GB HBM3 (gpu)", "device_kind": "NVIDIA H100 80GB HBM3",
             "results": [{"height": 192, "width": 640, "batch": 12, "num_layers": 18, "images_per_s_median": 4.4}]}
    (tmp_path / "fp32_distill_cold.json").write_text(json.dumps(stale))
    env = dict(os.environ, PYTHON=sys.executable, GPU_RUNS="fp32_distill_cold", LIMIT_SCALE="6",
               BENCH_ARGS="--steps 1 --warmup 0 --teacher-stride 0")  # fails at its argument check
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"=== fp32_distill_cold: FAILED \(exit status 2\) after \d+ s; its log: ", summary), summary
    assert "runs that FAILED: fp32_distill_cold" in summary
    assert not (tmp_path / "fp32_distill_cold.json").exists() and "4.4" not in summary


def test_code_version_is_none_in_another_repository(tmp_path, monkeypatch):
    """Installed into a venv inside the user's own git repository, the bench recorded that
    repository's commit as the code measured. Now None there (the checkout's commit above)."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("no git")
    outer = tmp_path / "user_repo"
    package = outer / "venv" / "lib" / "site-packages" / "xdistill_jax"
    package.mkdir(parents=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "u", "GIT_AUTHOR_EMAIL": "u@x", "GIT_COMMITTER_NAME": "u",
           "GIT_COMMITTER_EMAIL": "u@x"}
    for cmd in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *cmd], cwd=outer, env=env, check=True)
    monkeypatch.setattr(benchmark, "__file__", str(package / "benchmark.py"))
    assert benchmark.code_version() is None
