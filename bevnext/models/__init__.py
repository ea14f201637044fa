"""Model modules and the detector — filled by the model issue."""
