"""The built-in recipes (one YAML each, `+recipe=NAME`), shipped as package `launcher.recipes`."""
