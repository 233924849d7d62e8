"""posbias.runtime"""
