from setuptools import find_packages, setup

setup(
    name="clickstream-beam",
    version="0.1.0",
    description="Exactly-once clickstream metrics on Apache Beam: early, on-time, late "
                "and final panes with a retracting changelog.",
    python_requires=">=3.11",
    packages=find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*",
                                    "schemas", "runners", "runners.*", "serving"]),
    package_data={"schemas": ["*.avsc", "*.sql", "*.json"],
                  "serving": ["static/*", "static/vendor/*"]},
    install_requires=[
        "apache-beam[gcp]>=2.77.0,<2.78",
        "fastavro>=1.9",
        "google-cloud-bigtable>=2.20",
        "datasketches>=5.0",
        "duckdb>=1.1",
        "orjson>=3.9",
        "pyarrow>=14",
        "prometheus-client>=0.20",
        "confluent-kafka>=2.4",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        # uvicorn picks them up when installed: a C HTTP parser and event loop, where
        # the pure-Python h11 and asyncio loop cap one process near 1,000 requests/s.
        "httptools>=0.6",
        "uvloop>=0.19",
    ],
    extras_require={
        "test": ["apache-beam[test]>=2.77.0,<2.78", "pytest>=8", "pytest-timeout>=2",
                 "hypothesis>=6.100", "ruff>=0.6", "mypy>=1.10",
                 "httpx>=0.27", "playwright>=1.40"],
    },
    entry_points={"console_scripts": ["clickstream=pipeline.cli:main"]},
)
