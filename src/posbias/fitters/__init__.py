"""posbias.fitters"""
