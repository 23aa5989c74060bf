"""`pbs-engine eval`: PBS against dense attention on real models and real long text."""
