"""Every endpoint: `POST /v1` and images (`http`), the WebSocket (`ws`, with `sessions`), `GET /tasks`
(`task_view`), `/health`, `/ready`, `/metrics` (`health`), the playground and `/docs` (`playground`),
authentication (`auth`) and the listener (`listen`). Imports everything below it; nothing imports it but
the app and the CLI."""
