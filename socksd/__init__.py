"""socksd: a pre-forking SOCKS5 proxy."""
