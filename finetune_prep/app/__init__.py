"""The application: CLI, pipeline, proof, report, sweeps and the run folder."""
