"""What the model needs in memory: profiles, meters, probe steps and the fake-tensor estimate."""
