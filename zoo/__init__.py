"""ldpruner.zoo: the embedded default models, trained here on data that ships inside packages."""
