"""What the pipeline's results become for people and other code bases: contact sheets, summaries, exports."""
