"""What runs inside a socksd worker process: loop, sessions, relay, egress."""
