-- Runs once, on an empty data volume: the MLflow database beside the Optuna one (POSTGRES_DB).
CREATE DATABASE mlflow;
