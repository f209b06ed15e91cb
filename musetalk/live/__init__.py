"""Live lip-sync without Pipecat: per-session scheduling and the shared generation service."""
