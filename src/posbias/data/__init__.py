"""posbias.data"""
