"""WorldStereo Studio inference engine (no UI code)."""
