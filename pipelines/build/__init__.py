"""The dataset build: prompt sources, stages, transports, the sink and the manifest."""
