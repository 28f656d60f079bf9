"""The synthetic driving world in KITTI raw layout (see README.md in this folder).

Entry point: `data_pipelines.synthetic_world.generate.generate_world(out, seed, ...)`, or
`xdistill synth`. Modules: scene (layout), textures, raycast, render, rig (calibration, oxts),
kitti_writer, make3d_writer.
"""
