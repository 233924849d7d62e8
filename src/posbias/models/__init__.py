"""posbias.models"""
