"""The service runtime every gRPC service stands on: settings, server bootstrap, auth, metrics."""
