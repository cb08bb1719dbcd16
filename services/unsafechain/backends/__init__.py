"""Model backends behind one interface: local transformers, OpenAI-compatible servers, TGI."""
