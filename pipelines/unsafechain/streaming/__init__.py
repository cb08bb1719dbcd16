"""The streaming runtime every pipeline runs on: stages, transports, the case store."""
