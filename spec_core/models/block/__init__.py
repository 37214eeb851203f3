"""DFlash and DSpark: config, models, block attention, block losses, objective, export parts."""
