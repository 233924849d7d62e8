"""posbias.artifacts"""
