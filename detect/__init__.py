"""Detect: run a model on images or a video and look at the result (``Detector``, ``centernet-detect``)."""
