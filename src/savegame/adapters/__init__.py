"""Framework adapters (torch, keras, RNG); each imported lazily."""
