"""privfl on Flower: ClientApp/ServerApp hosting Sites and the Aggregator, and local deployment."""
