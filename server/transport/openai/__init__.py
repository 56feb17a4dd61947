"""The OpenAI Images API beside the Runware API (for Open WebUI, LibreChat, LiteLLM and the `openai` SDKs): the
routes (`router`), the request fields and error shape (`protocol`), and the translation into one Runware
`imageInference` task and back (`serving`)."""
