"""The OpenAI-Realtime-compatible WebSocket endpoint over Converse, and spoken answers (docs/realtime.md)."""
