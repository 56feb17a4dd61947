"""The Runware protocol as data: wire models (`models`), errors (`errors`), validation at the edge
(`validation`), JSON in and out (`wire`), output image formats (`output_formats`) and the OpenAPI document
(`openapi`). Imports nothing else of the server."""
