"""Benchmark rig for tcmu-obd: an emulated long, capped registry link and the fill benchmark."""
