"""The generation engine a model replica runs: plain Python over torch and transformers, no Ray, no HTTP."""
