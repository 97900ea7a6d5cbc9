"""export/models"""
