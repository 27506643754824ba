"""Calibration: what the calibrated passes share.

* :mod:`~qcompile.calibration.engine`: the one-block engine (run the decoder block by block,
  spill activations to disk, hand each block to an algorithm);
* :mod:`~qcompile.calibration.data`: calibration text and windows from recipe options;
* :mod:`~qcompile.calibration.record`: the calibrated weights saved in a bundle, replayed by
  ``verify`` and ``eval``;
* :mod:`~qcompile.calibration.observers`: activation observers (per-channel ranges now; the
  activation-quantization and smoothing statistics join them).
"""
