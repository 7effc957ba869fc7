"""Builders the tests share (planted storages, layouts); imported as ``helpers.<module>``."""
