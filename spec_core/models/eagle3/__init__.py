"""EAGLE-3: config, model, TTT attention, losses, objective, export parts, proposer."""
