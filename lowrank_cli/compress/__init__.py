"""The method, model in -> model out: rank plans, SVDs (plain and whitened), calibration, budgets, speed plans."""
