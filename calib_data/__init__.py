"""calib_data"""
