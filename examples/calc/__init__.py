"""The multi-turn example: multiplying a 3-digit by a 2-digit number, which the tiny model cannot do in its head,
with a calculator tool it learns to call (`examples/calc_tools.yaml`)."""
