"""Veo 3: the client for Google's API, its simulator, and the price table."""
