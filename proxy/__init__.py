"""The sidecar proxy: listeners, protocol detection, post-quantum mesh TLS, HTTP/1.1, HTTP/2,
gRPC, WebSocket and TCP relaying, balancing, retries, timeouts, inbound policy, metrics, tap and
the admin server. Protocol cores are pure and sans-IO; one asyncio driver owns the sockets."""
