"""posbias.cli"""
