"""keye.data"""
