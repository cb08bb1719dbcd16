"""The streaming dataset build, its stages, transports, sink and exports."""
