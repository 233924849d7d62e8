"""posbias.reports"""
