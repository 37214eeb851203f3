"""The ground floor every other package agrees on: sample and batch types with their tensor names
(``samples``), the capture-index convention and its one validator (``capture``), and the batch-plan
arithmetic (``plan``). Nothing here imports a higher floor, so engines, models, transfer and
training can all depend on it without import circles.
"""
