"""posbias.solvers"""
