#!/usr/bin/env bash
cd "$(dirname "$0")/.." && exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@"
