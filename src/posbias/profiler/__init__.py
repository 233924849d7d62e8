"""posbias.profiler"""
