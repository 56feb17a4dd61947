"""The serving logic: the `dispatcher`, one handler module per task type (`image_inference`,
`get_response`, `image_upload`, `model_search`), the translation to and from the worker (`to_spec`,
`result_items`), input images (`input_images`), what happens to a finished generation (`delivery`),
per-client bounds (`admission`) and the model's lifecycle (`slot`). Imports `protocol`, `store`,
`outbound`, `ops` and `pipelines.worker`; knows no transport."""
