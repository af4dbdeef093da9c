"""Serving the numbers: `clickstream serve`, an HTTP API and a dashboard over the sinks.

`stores` reads DuckDB, Bigtable or BigQuery; `uniques` counts distinct users over any
range (HLL sketch unions, or exact from the raw archive); `health` reads the job's
metrics; `app` is the FastAPI application; `command` parses flags and runs uvicorn;
`static/` is the dashboard.
"""
