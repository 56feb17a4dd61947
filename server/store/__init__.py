"""What the server keeps, behind interfaces: task records (`task_records`: SQLite), images (`images`: a
folder; `s3`), the webhook/upload outbox (`outbox`) and WebSocket session buffers (`session_buffers`);
`postgres` implements records, outbox and buffers for several front-ends. Blocking calls run on the
thread pools of `executors`. Imports only `protocol` (errors) and the configuration."""
