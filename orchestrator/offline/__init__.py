"""Offline training on preference data, without Ray: reward models (`train_rm`) and DPO (`train_dpo`)."""
